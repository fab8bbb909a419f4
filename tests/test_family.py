"""The instance-adaptive family beside IAAT and GAIRAT: MMA, CAT and MAIL against ports of their authors' code,
the deliberate differences pinned, and their per-sample state saved, exported and resumed bitwise."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import iaat
from helpers import ctrl_c_at_step, run_main, tiny_train_args
from iaat.engine.checkpoint import load_checkpoint
from iaat.errors import ConfigError

TOL = 1e-6


def linear_model(seed: int = 0, scale: float = 4.0) -> nn.Module:
    """A float64 linear classifier on 3x4x4 images, confident enough that some samples have a negative soft margin."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 10)).double()
    with torch.no_grad():
        model[1].weight.mul_(scale)
    return model


def batch(model: nn.Module, n: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0.2, 0.8] (every point the tests reach stays inside [0, 1]); the model's own label for the first
    half, the next class for the rest (misclassified)."""
    torch.manual_seed(seed)
    x = 0.2 + 0.6 * torch.rand(n, 3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = torch.where(torch.arange(n) < n // 2, pred, (pred + 1) % 10)
    return x, y


def grads(model: nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(model.parameters())))


def assert_close(a, b, what: str) -> None:
    for u, v in zip(a, b):
        assert (u - v).abs().max() <= TOL, what


# -- MMA: ports of BorealisAI/mma_training (anpgd.py, trainer.py) and of advertorch's loss and PGD ---------------
def port_soft_logit_margin_loss(logits, targets):
    """advertorch/loss.py soft_logit_margin_loss, reduction none."""
    batch_size, num_class = logits.size(0), logits.size(1)
    mask = torch.ones_like(logits).bool()
    mask[torch.arange(batch_size), targets] = 0
    logits_true_label = logits[torch.arange(batch_size), targets]
    logits_other_label = logits[mask].reshape(batch_size, num_class - 1)
    return torch.logsumexp(logits_other_label, dim=1) - logits_true_label


def port_bisection_search(cur_eps, ptb, model, data, label, fn_margin, margin_init, maxeps, num_steps,
                          cur_min=None, clip_min=0., clip_max=1.):
    """anpgd.py bisection_search (batch_multiply written out)."""
    assert torch.all(cur_eps <= maxeps)
    margin = margin_init
    if cur_min is None:
        cur_min = torch.zeros_like(margin)
    cur_max = maxeps.clone().detach()
    for _ii in range(num_steps):
        cur_min = torch.max((margin < 0).float() * cur_eps, cur_min)
        cur_max = torch.min(((margin < 0).float() * maxeps + (margin >= 0).float() * cur_eps), cur_max)
        cur_eps = (cur_min + cur_max) / 2
        margin = fn_margin(model(torch.clamp(data + cur_eps.view(-1, 1, 1, 1) * ptb, min=clip_min, max=clip_max)),
                           label)
    assert torch.all(cur_eps <= maxeps)
    return cur_eps


def port_linf_pgd(model, x, y, eps, eps_iter, nb_iter):
    """advertorch LinfPGDAttack.perturb (rand_init, clip [0, 1]) with per-sample eps, on the summed soft margin."""
    e, a = eps.view(-1, 1, 1, 1), eps_iter.view(-1, 1, 1, 1)
    delta = torch.zeros_like(x).uniform_(-1, 1) * e
    delta = torch.clamp(x + delta, 0, 1) - x
    for _ in range(nb_iter):
        delta.requires_grad_(True)
        (g,) = torch.autograd.grad(port_soft_logit_margin_loss(model(x + delta), y).sum(), delta)
        delta = delta.detach() + a * g.sign()
        delta = torch.max(torch.min(delta, e), -e)
        delta = torch.clamp(x + delta, 0, 1) - x
    return torch.clamp(x + delta, 0, 1)


def port_anpgd_perturb(model, x, y, prev_eps, maxeps, nb_iter=10, eps_iter_scale=2.5, num_search_steps=10):
    """anpgd.py ANPGD.perturb with _get_unitptb_and_eps."""
    xadv = port_linf_pgd(model, x, y, prev_eps, eps_iter_scale * prev_eps / nb_iter, nb_iter)
    unitptb = (1. / (prev_eps + 1e-12)).view(-1, 1, 1, 1) * (xadv - x)
    with torch.no_grad():
        logit_margin = port_soft_logit_margin_loss(model(xadv), y)
        curr_eps = port_bisection_search(prev_eps, unitptb, model, x, y, port_soft_logit_margin_loss, logit_margin,
                                         maxeps * torch.ones_like(y).double(), num_search_steps)
    return x + curr_eps.view(-1, 1, 1, 1) * unitptb, curr_eps


def port_mma_step(model, data, target, idx, dct_eps, mineps, hinge_maxeps, clean_loss_coeff, nb_iter):
    """trainer.py Trainer.train_one_batch with get_eps / update_eps: the parameter gradient it applies."""
    clnoutput = model(data)
    clnloss = F.cross_entropy(clnoutput, target)
    clean_grads = grads(model, clnloss)
    search_loss = port_soft_logit_margin_loss(clnoutput, target)
    cln_correct, cln_wrong = search_loss < 0, search_loss >= 0
    num_correct, num_wrong = int(cln_correct.sum()), int(cln_wrong.sum())
    data = data.clone()
    curr_eps = data.new_zeros(len(data))
    if num_correct > 0:
        prev_eps = data.new_tensor([max(mineps, dct_eps.setdefault(int(i), mineps)) for i in idx[cln_correct]])
        advdata_correct, curr_eps_correct = port_anpgd_perturb(model, data[cln_correct], target[cln_correct],
                                                               prev_eps, 1.05 * hinge_maxeps, nb_iter)
        data[cln_correct] = advdata_correct
        curr_eps[cln_correct] = curr_eps_correct
    mmaoutput = model(data)
    marginloss = F.cross_entropy(mmaoutput[cln_correct], target[cln_correct], reduction="none")
    clsloss = F.cross_entropy(mmaoutput[cln_wrong], target[cln_wrong]) if num_wrong else 0.
    marginloss = marginloss[hinge_maxeps > curr_eps[cln_correct]]
    mmaloss = (marginloss.sum() + clsloss * num_wrong) / len(data)
    mma_grads = grads(model, mmaloss)
    for j, i in enumerate(idx):
        dct_eps[int(i)] = float(curr_eps[j])
    return [(1 - clean_loss_coeff) * m + clean_loss_coeff * c for m, c in zip(mma_grads, clean_grads)], curr_eps


@pytest.mark.parametrize("clean_weight", [1 / 3, 0.0])
def test_mma_equals_the_authors_training_step(clean_weight):
    """Two steps on the same samples (the margins carried from the first to the second): the margins, the
    memory and the parameter gradient equal the authors' to 1e-6; MMA-12 and OMMA."""
    model = linear_model(scale=15.0)
    x, y = batch(model)
    idx = torch.arange(len(y)) * 3
    method = iaat.MMA(num_train=40, steps=5, hinge_max=12 / 255, clean_weight=clean_weight)
    dct_eps: dict = {}
    for step in range(2):
        torch.manual_seed(10 + step)
        theirs, their_eps = port_mma_step(model, x, y, idx, dct_eps, 0.005, 12 / 255, clean_weight, nb_iter=5)
        torch.manual_seed(10 + step)
        ours = grads(model, method.loss(model, x, y, idx))
        assert_close(ours, theirs, f"gradient at step {step}")
        assert (method.radii[idx].double() - their_eps).abs().max() <= TOL
    correct = their_eps > 0
    assert 0 < int(correct.sum()) < len(y), "the batch must hold samples on both sides"
    assert (method.radii[idx][~correct] == 0).all()  # misclassified when clean: margin 0, as theirs
    assert bool((their_eps > 12 / 255).any())  # the hinge left a sample out


def test_mma_bisection_equals_the_authors_and_finds_the_boundary():
    """The search alone, from radii on both sides of each sample's boundary: the authors' result to 1e-6, and the
    soft margin changes sign within one bisection interval of it."""
    model = linear_model(scale=15.0)
    x, y = batch(model)
    x, y = x[:6], y[:6]
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(port_soft_logit_margin_loss(model(x), y).sum(), x)
    x, direction = x.detach(), g.sign()  # the attack's direction: the margin rises along it
    upper, width = 0.2, 2 * 0.2 / 2 ** 10
    for start in (0.01, 0.08):
        eps = torch.full((6,), start, dtype=torch.float64)
        x_adv = x + start * direction
        with torch.no_grad():
            theirs = port_bisection_search(eps, direction, model, x, y, port_soft_logit_margin_loss,
                                           port_soft_logit_margin_loss(model(x_adv), y), torch.full_like(eps, upper),
                                           10)
            ours, point = iaat.methods.mma.bisect_margin(model, x, y, eps, x_adv, upper, 10)
            assert (ours - theirs).abs().max() <= TOL
            assert torch.allclose(point, (x + ours.view(-1, 1, 1, 1) * direction).clamp(0, 1), atol=1e-12)
            inside = port_soft_logit_margin_loss(model(x), y) < 0
            assert int(inside.sum()) >= 3
            near = lambda t: port_soft_logit_margin_loss(model(x + t.view(-1, 1, 1, 1) * direction), y)  # noqa: E731
            assert (near(ours - width)[inside] < 0).all() and (near(ours + width)[inside] >= 0).all()


def test_mma_searches_in_eval_mode_and_trains_on_valid_images():
    """Deliberate differences: BatchNorm's running statistics see only the training forwards (theirs also the
    search's), and the training example stays in [0, 1] (theirs may leave it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 2 * 2, 10))
    with torch.no_grad():
        model[3].weight.mul_(20)  # confident: most samples have a negative soft margin and are attacked
    x = 0.9 + 0.1 * torch.rand(16, 3, 4, 4)  # near the top of the range: x + margin * direction would leave it
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    model.train()
    method = iaat.MMA(num_train=16, steps=3, min_eps=0.1, hinge_max=0.5)
    objective = method.objective(model, x, y, torch.arange(16))
    assert model[1].num_batches_tracked == 0  # attack and search left BatchNorm alone
    assert int((method.radii > 0).sum()) >= 8
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    objective(model).loss.backward()
    assert model[1].num_batches_tracked == 2  # the clean and the adversarial training forwards
    assert not torch.equal(seen[1], x) and seen[1].min() >= 0 and seen[1].max() <= 1


def test_mma_state_errors():
    method = iaat.MMA(num_train=10)
    with pytest.raises(ConfigError, match="lacks radii"):
        method.load_state_dict({"memory": torch.zeros(10)})
    with pytest.raises(ConfigError, match="has 5 entries but the training set has 10"):
        method.load_state_dict({"radii": torch.zeros(5)})
    with pytest.raises(ConfigError, match="num_train"):
        iaat.MMA()
    with pytest.raises(ConfigError, match="min_eps"):
        iaat.MMA(num_train=10, min_eps=0.2, hinge_max=0.1)


# -- CAT: ports of cmhcbb/CAT-Customized-Adversarial-Training (main_adv_cus.py, attacker/pgd.py), version 2 ------
def port_dirilabel(targets, eps, n_class=10):
    """main_adv_cus.py dirilabel (.cuda() dropped)."""
    batch_size = targets.size(0)
    tmp_eps = (eps * 10).view(-1, 1)
    one_hot = torch.zeros((batch_size, n_class)).scatter(1, targets.view(-1, 1), 1)
    distri = torch.distributions.Dirichlet(torch.ones(n_class))
    return one_hot * (1 - tmp_eps) + distri.rsample(sample_shape=(batch_size,)) * tmp_eps, one_hot


def port_linf_pgd_so_cw(x_nat, y_true, net, steps, eps, one_hot, lr=0.007):
    """attacker/pgd.py Linf_PGD_so_cw with cw=True (Linf_SGD: x -= lr * sign(grad)); returns x_adv and the mask
    of samples still classified correctly."""
    x_adv = x_nat.clone()
    zero = torch.zeros(len(x_nat), dtype=x_nat.dtype)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        out = net(x_adv)
        real = torch.max(out * one_hot - (1 - one_hot) * 100000, dim=1)[0]
        other = torch.max(torch.mul(out, (1 - one_hot)) - one_hot * 10000, 1)[0]
        loss1 = torch.sum(torch.max(real - other + 10, zero) * eps)
        loss2 = (y_true * F.log_softmax(out, dim=1)).sum() / x_adv.size(0)
        (g,) = torch.autograd.grad(loss1 + loss2, x_adv)
        x_adv = x_adv.detach() - lr * g.sign()
        diff = x_adv - x_nat
        diff = torch.max(diff, -eps.view(-1, 1, 1, 1).expand_as(diff))
        diff = torch.min(diff, eps.view(-1, 1, 1, 1).expand_as(diff))
        x_adv = (diff + x_nat).clamp_(0, 1)
    mask = torch.max(net(x_adv), dim=1)[1] == torch.max(y_true, dim=1)[1]
    return x_adv, mask


def port_cat_step(net, inputs, targets, index, eps, steps):
    """main_adv_cus.py train_soadp, version 2 with cw: the loss it backpropagates; updates ``eps`` in place."""
    eps[index] += 0.0025
    eps.clamp_(max=0.035)
    so_targets, one_hot = port_dirilabel(targets, eps[index])
    adv_x, mask = port_linf_pgd_so_cw(inputs, so_targets, net, steps, eps[index], one_hot)
    eps[index[mask]] -= 0.0025
    outputs = net(adv_x)
    so_targets, one_hot = port_dirilabel(targets, eps[index])
    real = torch.max(outputs * one_hot - (1 - one_hot) * 100000, dim=1)[0]
    other = torch.max(torch.mul(outputs, (1 - one_hot)) - one_hot * 100000, 1)[0]
    loss1 = torch.sum(torch.max(other - real + 10, torch.zeros_like(real)) * eps[index])
    loss2 = - (so_targets * F.log_softmax(outputs, dim=1)).sum() / inputs.size(0)
    return loss1 + loss2


def test_cat_authors_mode_equals_the_authors_training_step():
    """Three steps (radii carried over): the radii, the loss and its gradient equal the released code's to 1e-6."""
    model = linear_model(scale=1.0)
    x, y = batch(model)
    index = torch.arange(len(y)) + 5
    eps = torch.zeros(30, dtype=torch.float64)
    method = iaat.CAT(num_train=30, eps=0.035, step_size=0.007, steps=4, random_start=False,
                      compat="authors")
    for step in range(3):
        torch.manual_seed(20 + step)
        their_loss = port_cat_step(model, x, y, index, eps, steps=4)
        theirs = grads(model, their_loss)
        torch.manual_seed(20 + step)
        out = method.compute(model, x, y, index)
        assert abs(float(out.loss.detach()) - float(their_loss.detach())) <= TOL
        assert_close(grads(model, out.loss), theirs, f"gradient at step {step}")
        assert (method.radii.double() - eps).abs().max() <= TOL
    assert len(set(method.radii[index].tolist())) > 1  # radii went separate ways


def test_cat_follows_the_paper_by_default():
    """The paper's update: a sample that stays correct keeps its raise (up to the cap), a fooled one keeps its
    radius; the released code's is the other way round (compat: authors)."""
    model = linear_model(scale=15.0)
    x, y = batch(model)
    w = model[1].weight.detach()
    with torch.no_grad():
        logits = model(x)
    # a linear model is robust at radius r exactly when z_y - z_k > r * ||w_y - w_k||_1 for every other class k
    gaps = logits.gather(1, y[:, None]) - logits
    need = (w[y][:, None, :] - w[None, :, :]).abs().sum(2) * (8 / 255)
    robust = ((gaps > need) | (torch.arange(10) == y[:, None])).all(1)
    wrong = logits.argmax(1) != y
    assert int(robust.sum()) >= 2 and int(wrong.sum()) >= 2
    paper = iaat.CAT(num_train=len(y), eps=8 / 255, eta=2 / 255, steps=3, random_start=False)
    authors = iaat.CAT(num_train=len(y), eps=8 / 255, eta=2 / 255, steps=3, random_start=False, compat="authors")
    index = torch.arange(len(y))
    for visit in range(1, 6):
        paper.loss(model, x, y, index)
        authors.loss(model, x, y, index)
        expected = min(visit * 2, 8) / 255
        assert torch.allclose(paper.radii[robust], torch.full((int(robust.sum()),), expected))
        assert (paper.radii[wrong] == 0).all()
    assert (authors.radii[robust] == 0).all()  # every raise taken back
    assert torch.allclose(authors.radii[wrong], torch.full((int(wrong.sum()),), 8 / 255))


def test_cat_labels_and_errors():
    torch.manual_seed(0)
    labels = iaat.methods.cat.smoothed_labels(torch.tensor([1, 2]), 10, torch.tensor([0.0, 0.2]))
    assert torch.equal(labels[0], F.one_hot(torch.tensor(1), 10).float())
    assert abs(float(labels[1].sum()) - 1) < 1e-6 and float(labels[1, 2]) >= 0.8
    with pytest.raises(ConfigError, match="smoothing times eps"):
        iaat.CAT(num_train=4, eps=32 / 255, smoothing=10)
    with pytest.raises(ConfigError, match="train_loss must be ce or mix"):
        iaat.CAT(num_train=4, train_loss="trades")


# -- MAIL: ports of QizhouWang/MAIL (mail_loss.py) ---------------------------------------------------------------
def port_pm(logit, target):
    """mail_loss.py PM (eye(10) on the CPU)."""
    eye = torch.eye(10, dtype=logit.dtype)
    probs_gt = (logit.softmax(1) * eye[target]).sum(1).detach()
    top2_probs = logit.softmax(1).topk(2, largest=True)
    gt_in_top2_ind = (top2_probs[1] == target.view(-1, 1)).float().sum(1) == 1
    probs_2nd = torch.where(gt_in_top2_ind, top2_probs[0].sum(1) - probs_gt, top2_probs[0][:, 0]).detach()
    return probs_2nd - probs_gt


def port_weight_assign(logit, target, bias, slope):
    """mail_loss.py weight_assign."""
    pm = port_pm(logit, target)
    reweight = ((pm + bias) * slope).sigmoid().detach()
    return reweight * 3


def port_mail_loss(model, x_natural, x_adv, y, method, bias, slope, beta):
    """The loss part of mail_loss.py mail_loss, 'at' and 'trades' branches."""
    kl = nn.KLDivLoss(reduction="none")
    batch_size = len(x_natural)
    if "trades" in method:
        logits = model(x_natural)
        logits_adv = model(x_adv)
        norm_weight = port_weight_assign(logits_adv, y, bias, slope)
        loss_natural = F.cross_entropy(logits, y)
        loss_robust = (1.0 / batch_size) * torch.sum(
            torch.sum(kl(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1)), dim=1) * norm_weight)
        return loss_natural + float(beta) * loss_robust, norm_weight
    logits_adv = model(x_adv)
    norm_weight = port_weight_assign(logits_adv, y, bias, slope)
    return (F.cross_entropy(logits_adv, y, reduction="none") * norm_weight).mean(), norm_weight


@pytest.mark.parametrize("train_loss, bias, slope, beta", [("at", -0.5, 10.0, 5.0), ("trades", 0.0, 2.0, 5.0)])
def test_mail_equals_the_authors_loss(train_loss, bias, slope, beta, monkeypatch):
    """At the same adversarial examples: the weights, the loss and its gradient equal the authors' to 1e-6."""
    model = linear_model(scale=8.0)
    x, y = batch(model)
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    method = iaat.MAIL(num_train=len(y), train_loss=train_loss, bias=bias, slope=slope, trades_beta=beta)
    monkeypatch.setattr(method, "attack_batch", lambda *a, **k: SimpleNamespace(x_adv=x_adv))
    monkeypatch.setattr(iaat.methods.mail, "trades_examples", lambda *a, **k: x_adv)
    method.start_epoch(0)
    out = method.compute(model, x, y, torch.arange(len(y)))
    theirs, weights = port_mail_loss(model, x, x_adv, y, "mail_" + train_loss, bias, slope, beta)
    assert abs(float(out.loss.detach()) - float(theirs.detach())) <= TOL
    assert_close(grads(model, out.loss), grads(model, theirs), "gradient")
    assert (method.weights.double() - weights).abs().max() <= TOL
    assert float(weights.max() - weights.min()) > 0.1  # weights that differ: the comparison means something


def test_mail_margin_every_class_count_and_burn_in(monkeypatch):
    """The margin equals the authors' PM (sign flipped) wherever the true class ranks, and works beyond 10 classes;
    during the burn-in every weight is 1 and the loss is plain PGD-AT's."""
    logits = torch.tensor([[3.0, 1.0, 0.0] + [0.0] * 7, [1.0, 3.0, 0.0] + [0.0] * 7, [0.0, 1.0, 3.0] + [0.0] * 7])
    y = torch.tensor([0, 0, 3])  # the true class first, second, outside the top two
    assert torch.allclose(iaat.methods.mail.probabilistic_margin(logits, y), -port_pm(logits, y))
    assert iaat.methods.mail.probabilistic_margin(torch.randn(4, 100), torch.arange(4)).shape == (4,)
    model = linear_model(scale=1.0)
    x, y = batch(model)
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    method = iaat.MAIL(num_train=len(y), burn_in_epochs=1)
    monkeypatch.setattr(method, "attack_batch", lambda *a, **k: SimpleNamespace(x_adv=x_adv))
    for epoch, plain in ((0, True), (1, False)):
        method.start_epoch(epoch)
        loss = method.loss(model, x, y, torch.arange(len(y)))
        assert bool((method.weights == 1).all()) == plain
        assert torch.allclose(loss, F.cross_entropy(model(x_adv), y)) == plain



def test_mail_normalize_scales_the_authors_weights_to_mean_one(monkeypatch):
    """``normalize: true`` (the paper): the authors' weights divided by their batch mean, so the loss is the
    authors' loss over that mean; the default leaves them as the authors' code does."""
    model = linear_model(scale=8.0)
    x, y = batch(model)
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    out = {}
    for normalize in (False, True):
        method = iaat.MAIL(num_train=len(y), normalize=normalize)
        monkeypatch.setattr(method, "attack_batch", lambda *a, **k: SimpleNamespace(x_adv=x_adv))
        method.start_epoch(0)
        out[normalize] = (method.loss(model, x, y, torch.arange(len(y))), method.weights.clone())
    theirs, weights = port_mail_loss(model, x, x_adv, y, "mail_at", -0.5, 10.0, 5.0)
    assert (out[False][1].double() - weights).abs().max() <= TOL
    assert abs(float(out[True][1].mean()) - 1.0) <= TOL and abs(float(weights.mean()) - 1.0) > 0.05
    assert (out[True][1].double() - weights / weights.mean()).abs().max() <= TOL
    assert abs(float(out[True][0].detach()) - float((theirs / weights.mean()).detach())) <= TOL

# -- every new method through the trainer: exported state, metrics, resume ---------------------------------------
FAMILY_ARGS = {
    "mma": ("--method", "mma"),
    "cat": ("--method", "cat", "--set", "attack.random_start=false"),
    "mail": ("--method", "mail", "--set", "method.burn_in_epochs=1"),
}
EXPORTED = {"mma": ("radii",), "cat": ("radii",), "mail": ("margins", "weights")}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILY_ARGS))
def test_family_method_trains_exports_and_resumes_bitwise(name, tiny_cifar, tmp_path):
    """Two epochs straight, and the same run stopped by Ctrl-C in the middle of epoch 2 then resumed: the same
    weights and per-sample state; every epoch's per-sample arrays and their summary in metrics.jsonl."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    code, _, err = run_main(*tiny_train_args(tiny_cifar, straight, 2, *FAMILY_ARGS[name]))
    assert code == 0, err
    cls = iaat.METHODS[name]
    with ctrl_c_at_step(cls, 8 + 3):
        code, _, err = run_main(*tiny_train_args(tiny_cifar, stopped, 2, *FAMILY_ARGS[name]))
    assert code == 130 and "at epoch 2 step 3 of 8" in err, err
    code, _, err = run_main("train", "--out", str(stopped), "--resume", "--no-progress")
    assert code == 0, err
    a, b = (load_checkpoint(r / "checkpoints" / "epoch_0002.pt") for r in (straight, stopped))
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for key in EXPORTED[name]:
        assert torch.equal(a["method"][key], b["method"][key]), key
        arrays = [np.load(straight / key / f"epoch_{e:04d}.npy") for e in (1, 2)]
        assert arrays[1].shape == (400,) and np.array_equal(arrays[1], a["method"][key].numpy())
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    summary_key = "weight_mean" if name == "mail" else "radius_mean"
    assert all(summary_key in row for row in rows)
    if name == "cat":
        assert rows[-1]["radius_max"] > 0  # some sample stayed robust and kept its raise
