"""The evaluation protocol: attack specs, the kernel's per-iterate record, DeepFool, MI-FGSM, sanity checks, resume."""

from __future__ import annotations

import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch
import iaat
import torch.nn.functional as F
from helpers import run_in_process, run_main
from torch import nn

from iaat.attacks import pgd
from iaat.attacks.deepfool import deepfool
from iaat.data import load_dataset
from iaat.errors import ConfigError
from iaat.evaluation import AttackSpec, build_plan, parse_attack, run_evaluation
from iaat.evaluation import attacks as eval_attacks
from iaat.models import build_model

EPS = 32 / 255  # digits are 8x8 with 17 grey levels: 32/255 is a moderate radius there


@pytest.fixture(scope="session")  # not torn down when `make test` runs this file's slow tests apart from the rest
def at_digits():
    """A small CNN adversarially trained on sklearn digits (PGD-3 at 32/255, 4 epochs; a few seconds)."""
    ds = load_dataset("digits")
    torch.manual_seed(0)
    net = build_model("small_cnn", ds.num_classes, 1, width=16, mean=ds.mean, std=ds.std)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    x, y = ds.train.x.float() / 255, ds.train.y
    for _ in range(4):
        perm = torch.randperm(len(x))
        for lo in range(0, len(x) - 1, 64):
            idx = perm[lo:lo + 64]
            x_adv = pgd(net, x[idx], y[idx], EPS, steps=3, final_check=False).x_adv
            net.train()
            loss = F.cross_entropy(net(x_adv), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    test = ds.test.subset(torch.arange(160))
    return net, test, ds.num_classes


def _evaluate(model, data, attacks, num_classes=10, **kw):
    plan = build_plan(eps=[EPS], attacks=attacks, **{k: kw.pop(k) for k in list(kw) if k in (
        "eps_sweep", "steps_sweep", "surrogate", "checks")})
    return run_evaluation(model, data, plan, num_classes=num_classes, fingerprint={"t": 1}, batch_size=64, **kw)


# --------------------------------------------------------------------------- specs


def test_parse_attack_kinds_and_defaults():
    cw = parse_attack("cw")
    assert (cw.kind, cw.loss, cw.steps) == ("pgd", "margin", 40) and cw.label == "CW-40"
    p = parse_attack("pgd:steps=100,restarts=5,eps=8")
    assert (p.steps, p.restarts) == (100, 5) and math.isclose(p.eps, 8 / 255) and p.label == "PGD-100x5@8/255"
    assert parse_attack("pgd:targeted=true").targeted
    assert parse_attack("mifgsm").random_start is False
    assert parse_attack("autoattack:version=quick").version == "quick"
    assert parse_attack("transfer:source=runs/a").source == "runs/a"
    # A fixed step size is part of the label, so a fixed-step sweep never shares state with PGD-k.
    assert AttackSpec(eps=EPS, steps=20, step_size=EPS / 4).label != AttackSpec(eps=EPS, steps=20).label



def test_a_transfer_attack_without_its_source_takes_the_surrogate():
    """``--attack transfer:steps=20 --surrogate RUN`` is one transfer attack of 20 steps crafted on RUN, as --help
    says (it was refused for want of source=); without a transfer in the list --surrogate adds the default one."""
    plan = build_plan(eps=[EPS], attacks=["pgd", "transfer:steps=20"], surrogate="runs/b")
    assert [(s.kind, s.steps, s.source) for s in plan.attacks] == [("pgd", 10, None), ("transfer", 20, "runs/b")]
    plan = build_plan(eps=[EPS], attacks=["pgd"], surrogate="runs/b")
    assert [(s.kind, s.steps, s.source) for s in plan.attacks] == [("pgd", 10, None), ("transfer", 10, "runs/b")]
    with pytest.raises(ConfigError, match="a transfer attack needs source=RUN"):
        build_plan(eps=[EPS], attacks=["transfer:steps=20"])
    plan = build_plan(eps=[EPS], attacks=["transfer:steps=20"], surrogate="runs/a,b")  # a path is not parsed
    assert [s.source for s in plan.attacks] == ["runs/a,b"]
    with pytest.raises(ConfigError, match="transfers from runs/x and from runs/b"):  # its own source stays
        build_plan(eps=[EPS], attacks=["transfer:source =runs/x"], surrogate="runs/b")


def test_a_main_radius_of_zero_is_said_not_silently_dropped():
    with pytest.warns(UserWarning, match="only the clean accuracy is reported"):
        assert build_plan(eps=[0.0], attacks=["pgd"]).attacks == []
    with pytest.warns(UserWarning, match="list a positive radius first"):
        build_plan(eps=[0.0, EPS], attacks=["pgd"])


def test_every_option_that_changes_results_tells_attacks_apart():
    """Two attacks reported under one label would share results (and resumable state): every option that changes
    what an attack does is in its label, or the plan refuses the pair."""
    variants = ["mifgsm", "mifgsm:momentum=0.5", "mifgsm:step_size=1", "deepfool", "deepfool:steps=20",
                "deepfool:candidates=3", "deepfool:overshoot=0.1"]
    labels = [parse_attack(t).at(EPS).label for t in variants]
    assert len(set(labels)) == len(labels), labels
    assert labels[0] == "MI-FGSM-10@32/255" and labels[3] == "DeepFool@32/255"  # the defaults keep their names
    plan = build_plan(eps=[EPS], attacks=variants + ["mifgsm:momentum=1"])  # the same attack twice runs once
    assert [s.label for s in plan.attacks] == labels
    with pytest.raises(ConfigError, match=r"both be reported as transfer-PGD-10@32/255.*one surrogate per command"):
        build_plan(eps=[EPS], attacks=["transfer:source=runs/a", "transfer:source=runs/b"])
    assert len(build_plan(eps=[EPS], attacks=["transfer:source=runs/a", "transfer:source=runs/a/"]).attacks) == 1
    # the kernel's options in spec objects too (a spec string's MI-FGSM starts without noise, the class's default)
    objects = [AttackSpec(kind="mifgsm"), AttackSpec(kind="mifgsm", targeted=True),
               AttackSpec(kind="mifgsm", loss="margin"), AttackSpec(kind="transfer", source="a", loss="margin")]
    labels = [s.label for s in build_plan(eps=[EPS], attacks=["mifgsm", *objects]).attacks]
    assert labels == ["MI-FGSM-10@32/255", "MI-FGSM-10-start@32/255", "MI-FGSM-10-targeted-start@32/255",
                      "MI-FGSM-10-start-margin@32/255", "transfer-PGD-10-margin@32/255"]


@pytest.mark.parametrize("text, message", [
    ("fgsm", "unknown attack 'fgsm'"),
    ("pgd:stepz=3", "has no option 'stepz'"),
    ("pgd:steps=ten", "steps='ten' is not a valid"),
    ("pgd:steps", "must look like key=value"),
    ("pgd:eps=-1", "negative"),
    ("autoattack:version=plus", "AutoAttack version must be one of"),
    ("transfer", "needs source=RUN"),
    ("cw:loss=ce", "has no option 'loss'"),
    ("mifgsm:momentum=nan", "momentum must be a finite number >= 0"),
    ("mifgsm:momentum=inf", "momentum must be a finite number >= 0"),
    ("deepfool:overshoot=-1", "overshoot must be a finite number >= 0"),
])
def test_parse_attack_errors_are_clear(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_attack(text)


# --------------------------------------------------------------------------- kernel additions


class _WrongAt(nn.Module):
    """Classifies every sample wrongly exactly at the forward calls listed in ``wrong`` (1-based), else right."""

    def __init__(self, wrong: set[int]):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.wrong, self.calls = wrong, 0

    def forward(self, x):
        self.calls += 1
        label = 1 if self.calls in self.wrong else 0
        return 5.0 * F.one_hot(torch.full((len(x),), label), 3).float() + self.w * x.flatten(1).sum(1, keepdim=True)


@pytest.mark.parametrize("wrong, first_miss", [(set(), 6), ({1}, 0), ({3}, 2), ({3, 4}, 2), ({6}, 5)])
def test_first_miss_records_the_first_misclassified_iterate(wrong, first_miss):
    # 5 steps: forward calls 1..5 see iterates x_0..x_4, call 6 is the final check of x_5.
    x, y = torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long)
    res = pgd(_WrongAt(wrong), x, y, 0.1, steps=5)
    assert res.first_miss.tolist() == [first_miss] * 4
    assert res.robust.tolist() == [first_miss == 6] * 4
    # A wrong intermediate iterate counts although the final one is right again.
    assert res.correct.all() or 6 in wrong


def test_first_miss_is_the_minimum_over_restarts():
    x, y = torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long)
    res = pgd(_WrongAt({8}), x, y, 0.1, steps=3, restarts=2)  # calls 5..8 are the second restart: x_3 is call 8
    assert res.first_miss.tolist() == [3, 3] and not res.robust.any()


class _Linear(nn.Module):
    def __init__(self, w: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.w, self.b = nn.Parameter(w), nn.Parameter(b)

    def forward(self, x):
        return x.flatten(1) @ self.w.T + self.b


def test_mifgsm_on_a_linear_model_moves_like_fgsm_steps():
    # With a constant gradient the momentum direction is the gradient's sign, every step.
    torch.manual_seed(0)
    model = _Linear(torch.randn(3, 12), torch.zeros(3))
    x, y = torch.rand(5, 3, 2, 2) * 0.5 + 0.25, torch.randint(0, 3, (5,))
    mi = pgd(model, x, y, 0.05, steps=4, step_size=0.0125, random_start=False, momentum=1.0, loss="margin")
    plain = pgd(model, x, y, 0.05, steps=4, step_size=0.0125, random_start=False, loss="margin")
    torch.testing.assert_close(mi.x_adv, plain.x_adv)


def test_long_attacks_keep_the_usual_step_instead_of_shrinking_it():
    """The default step is 2.5 * eps / steps up to 10 steps and eps / 4 beyond: PGD-100 and PGD-1000 take the 2/255
    steps of the usual evaluations at 8/255 (not 0.2/255 and 0.02/255), and the JSON says which step ran."""
    torch.manual_seed(0)
    model = _Linear(torch.randn(3, 12), torch.zeros(3))
    x, y = torch.rand(5, 3, 2, 2) * 0.5 + 0.25, torch.randint(0, 3, (5,))
    for steps, step in [(4, 2.5 * 0.05 / 4), (10, 2.5 * 0.05 / 10), (100, 0.05 / 4)]:
        default = pgd(model, x, y, 0.05, steps=steps, random_start=False, final_check=False)
        given = pgd(model, x, y, 0.05, steps=steps, step_size=step, random_start=False, final_check=False)
        assert torch.equal(default.x_adv, given.x_adv), steps
    res = iaat.evaluate(model, x, y, attacks=["pgd:steps=100", "cw", "mifgsm", "pgd:steps=5"], eps=8 / 255)
    steps = {label: round(255 * a["step"], 6) for label, a in res["attacks"].items()}
    assert steps == {"PGD-100@8/255": 2.0, "CW-40@8/255": 2.0, "MI-FGSM-10@8/255": 0.8, "PGD-5@8/255": 4.0}


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_deepfool_finds_the_exact_distance_to_a_linear_boundary(norm):
    torch.manual_seed(1)
    w = torch.randn(2, 12)
    model = _Linear(w, torch.zeros(2))
    x = torch.rand(6, 3, 2, 2) * 0.02 + 0.49  # far from the [0, 1] box, so no clipping
    y = model(x).argmax(1)
    gap = (model(x).gather(1, y[:, None]).squeeze(1) - model(x).gather(1, 1 - y[:, None]).squeeze(1)).detach()
    direction = (w[0] - w[1]).abs()
    dual = direction.sum() if norm == "linf" else direction.norm()
    expected = gap / dual
    res = deepfool(model, x, y, norm=norm, overshoot=0.02)
    assert res.fooled.all()
    torch.testing.assert_close(res.size, expected * 1.02, rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------- the protocol on a trained model


@pytest.fixture(scope="module")
def digits_eval(at_digits):
    net, test, k = at_digits
    torch.manual_seed(0)
    return _evaluate(net, test, ["pgd:steps=5", "pgd:steps=50,restarts=2", "cw:steps=20", "mifgsm", "deepfool",
                                 "pgd:steps=20,targeted=true"], num_classes=k,
                     eps_sweep=[0, 8 / 255, 16 / 255, EPS, 64 / 255], steps_sweep=[1, 2, 5, 10, 50])


def test_every_attack_lowers_accuracy_below_clean(digits_eval):
    assert digits_eval["clean"] > 0.8
    for label, entry in digits_eval["attacks"].items():
        assert entry["accuracy"] < digits_eval["clean"], label
    assert digits_eval["worst_case"]["accuracy"] <= min(a["accuracy"] for a in digits_eval["attacks"].values())


def test_stronger_settings_never_report_more_robustness(digits_eval):
    acc = {k: v["accuracy"] for k, v in digits_eval["attacks"].items()}
    tol = 3 / digits_eval["n"]
    assert acc["PGD-50x2@32/255"] <= acc["PGD-5@32/255"] + tol
    eps_curve = [p["accuracy"] for p in digits_eval["curves"]["eps"]["points"]]
    assert eps_curve[0] == digits_eval["clean"]
    assert all(b <= a + tol for a, b in zip(eps_curve, eps_curve[1:]))
    steps = [p["accuracy"] for p in digits_eval["curves"]["steps"]["points"]]
    assert all(b <= a for a, b in zip(steps, steps[1:]))  # one run, per-iterate record: exactly monotone
    assert steps[-1] < steps[0]


def test_sweeps_of_a_model_that_gets_nothing_right_are_zero(at_digits):
    """No image classified correctly, so none attacked: every point of both sweeps is 0 (no missing record)."""
    net, test, k = at_digits
    wrong = copy.deepcopy(test)
    with torch.no_grad():
        wrong.y = (net(wrong.x.float() / 255).argmax(1) + 1) % k
    res = _evaluate(net, wrong, ["pgd:steps=2"], num_classes=k, eps_sweep=[0, EPS], steps_sweep=[1, 2], checks=False)
    assert res["clean"] == 0 and res["attacks"]["PGD-2@32/255"]["accuracy"] == 0
    points = res["curves"]["eps"]["points"] + res["curves"]["steps"]["points"]
    assert [p["accuracy"] for p in points] == [0.0] * 4


def test_checks_stay_quiet_on_an_adversarially_trained_model(digits_eval):
    failed = [c for c in digits_eval["checks"] if not c["passed"]]
    assert not digits_eval["suspicious"] and not failed, failed
    names = {c["name"] for c in digits_eval["checks"]}
    assert {"deterministic", "useful input gradients", "consistent input gradients", "near zero at a very large eps",
            "non-increasing in eps", "stronger PGD not higher"} <= names


@pytest.mark.parametrize("autoattack, passed", [(0.46, True), (0.38, False)])
def test_autoattack_far_below_pgd_flags_the_pgd_numbers(autoattack, passed):
    """Croce & Hein's sign of gradient masking: AutoAttack more than 10 points below the strongest PGD."""
    from iaat.evaluation.checks import run_checks

    e = 8 / 255
    result = {"n": 1000, "clean": 0.8, "num_classes": 10, "attacks": {
        "PGD-10@8/255": {"kind": "pgd", "accuracy": 0.5, "eps": e, "norm": "linf", "loss": "ce", "steps": 10,
                         "restarts": 1},
        "AutoAttack-standard@8/255": {"kind": "autoattack", "accuracy": autoattack, "eps": e, "norm": "linf"}}}
    probe = {"max_logit_change": 0.0, "buffers_changed": [], "zero_gradient_share": 0.0,
             "outputs_are_probabilities": False}
    check = next(c for c in run_checks(result, probe) if c["name"] == "PGD close to AutoAttack")
    assert check["passed"] == passed and ("gradient masking" in check["detail"]) != passed, check


def test_deepfool_reports_the_size_it_needed(digits_eval):
    entry = digits_eval["attacks"]["DeepFool@32/255"]
    assert 0 < entry["median_size"] < 1 and 0 < entry["fooled_share"] <= 1


class _Quantised(nn.Module):
    """Gradient masking: the input is rounded to 4 levels before the model, so input gradients are zero."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 3) / 3)


def test_checks_fire_on_a_gradient_masked_model(at_digits):
    net, test, k = at_digits
    masked = _Quantised(net).eval()
    res = _evaluate(masked, test, ["pgd:steps=10", "transfer:source=plain"], num_classes=k,
                    surrogates={"plain": net}, eps_sweep=[0, EPS])
    failed = {c["name"] for c in res["checks"] if not c["passed"]}
    assert res["suspicious"]
    assert {"useful input gradients", "near zero at a very large eps", "transfer not below white-box"} <= failed
    assert res["suspicious_reasons"]


class _Shattered(nn.Module):
    """Shattered gradients (Athalye et al.): a tiny, very high-frequency term on the logits leaves the predictions
    as they were and makes the input gradients noise."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.register_buffer("phase", torch.rand(10, 64, generator=torch.Generator().manual_seed(0)) * 6.283)

    def forward(self, x):
        return self.net(x) + 1e-3 * torch.sin(1e5 * x.flatten(1)[:, None, :] + self.phase).sum(-1)


def test_checks_fire_on_shattered_gradients(at_digits):
    """Its PGD finds about nothing (robust as clean) and no other check sees why."""
    net, test, k = at_digits
    part = test.subset(torch.arange(64))
    details = {}
    for name, model in (("plain", net), ("shattered", _Shattered(net).eval())):
        res = _evaluate(model, part, ["pgd:steps=2"], num_classes=k)
        details[name] = {c["name"]: c for c in res["checks"]}["consistent input gradients"]
    assert details["plain"]["passed"] and "median cosine 1.00" in details["plain"]["detail"]
    assert not details["shattered"]["passed"] and "shattered gradients" in details["shattered"]["detail"]


def test_a_confident_models_tiny_gradients_are_consistent_not_shattered():
    """Logit margins near 30 give input gradients of norm 1e-13, under the eps of a plain cosine."""
    from iaat.evaluation.checks import probe_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    x = torch.rand(32, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
        model[1].weight.mul_(150), model[1].bias.mul_(150)
    assert probe_model(model, x, y)["gradient_cosine"] > 0.99


class _Noisy(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x) + 0.1 * torch.randn(len(x), 10)


def test_checks_flag_a_randomised_model(at_digits):
    net, test, k = at_digits
    res = _evaluate(_Noisy(net), test.subset(torch.arange(64)), ["pgd:steps=2"], num_classes=k)
    assert {c["name"]: c["passed"] for c in res["checks"]}["deterministic"] is False


def test_at_chance_is_clean_accuracy_within_noise_of_guessing():
    from iaat.evaluation.checks import at_chance

    assert at_chance(0.10, 1000, 10) and at_chance(0.115, 1000, 10) and at_chance(0.05, 1000, 10)
    assert not at_chance(0.14, 1000, 10)  # 4.2 standard errors above 10%
    assert at_chance(0.14, 100, 10)  # but within three on 100 images
    assert not at_chance(0.10, 1000, None) and not at_chance(0.5, 0, 10)  # unknown: no verdict


@pytest.mark.slow
def test_a_model_at_chance_is_flagged_in_eval_and_report(tiny_run, tmp_path):
    """The tiny run (one epoch on random images) guesses: eval fails its chance check, report warns."""
    pytest.importorskip("matplotlib", reason="iaat report needs matplotlib")
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    res = run_in_process("eval", str(run), "--n", "64", "--attack", "pgd:steps=2", "--no-progress")
    assert res.returncode == 0, res.stderr
    (result_file,) = (run / "eval").glob("*.json")
    result = json.loads(result_file.read_text())
    assert result["num_classes"] == 10 and result["clean"] <= 0.2
    chance = next(c for c in result["checks"] if c["name"] == "better than chance")
    assert not chance["passed"] and "meaningless" in chance["detail"] and result["suspicious"]
    assert "FAILED: better than chance" in result_file.with_suffix(".md").read_text()
    res = run_in_process("report", str(run))  # --out defaults to RUN/report for one folder
    assert res.returncode == 0, res.stderr
    assert "run is at chance level" in res.stdout + res.stderr and (run / "report" / "report.md").is_file()
    assert "Traceback" not in res.stderr and "No artists" not in res.stderr


# --------------------------------------------------------------------------- resume


def test_interrupted_evaluation_resumes_to_the_same_result(at_digits, tmp_path, monkeypatch):
    net, test, k = at_digits
    attacks = ["pgd:steps=5,restarts=2", "cw:steps=10"]
    full = _evaluate(net, test, attacks, num_classes=k, seed=3, checks=False)

    state = tmp_path / "e.state.npz"
    real, calls = eval_attacks.run_attack, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    from iaat.evaluation import protocol

    monkeypatch.setattr(protocol, "run_attack", dying)
    with pytest.raises(KeyboardInterrupt):
        _evaluate(net, test, attacks, num_classes=k, seed=3, checks=False, state_path=state)
    assert state.is_file()
    monkeypatch.setattr(protocol, "run_attack", real)
    resumed = _evaluate(net, test, attacks, num_classes=k, seed=3, checks=False, state_path=state)
    assert resumed["resumed"]
    assert {a: v["accuracy"] for a, v in resumed["attacks"].items()} == \
        {a: v["accuracy"] for a, v in full["attacks"].items()}
    # Another evaluation refuses the state instead of mixing results.
    plan = build_plan(eps=[EPS], attacks=attacks, checks=False)
    with pytest.raises(ConfigError, match="different evaluation"):
        run_evaluation(net, test, plan, num_classes=k, fingerprint={"t": 2}, state_path=state)


def test_a_cut_evaluation_keeps_the_attacks_it_finished(at_digits, tmp_path, monkeypatch):
    """``finished_part`` reads a cut evaluation's state: the clean accuracy and the first attack, which went through
    every image, as the full evaluation gives them; the second attack, cut after its first batch, is left out."""
    from iaat.evaluation import protocol

    net, test, k = at_digits
    attacks = ["pgd:steps=5", "cw:steps=10"]
    full = _evaluate(net, test, attacks, num_classes=k, seed=3, checks=False)
    batches = -(-round(full["clean"] * len(test)) // 64)
    assert batches >= 2  # so that the cut attack has finished a batch but not all
    real, calls = eval_attacks.run_attack, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > batches + 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(protocol, "run_attack", dying)
    state = tmp_path / "e.state.npz"
    with pytest.raises(KeyboardInterrupt):
        _evaluate(net, test, attacks, num_classes=k, seed=3, checks=False, state_path=state)
    first = next(iter(full["attacks"]))
    assert protocol.finished_part(state) == {"clean": full["clean"], first: full["attacks"][first]["accuracy"]}


# --------------------------------------------------------------------------- AutoAttack


def test_autoattack_missing_gives_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_aa(name, *args, **kwargs):
        if name.startswith("pyautoattack"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_aa)
    with pytest.raises(ConfigError, match="pip install"):
        build_plan(eps=[EPS], attacks=["autoattack"])


@pytest.mark.slow
def test_autoattack_is_not_weaker_than_pgd(at_digits):
    pytest.importorskip("pyautoattack", reason="AutoAttack is the optional extra pyautoattack")
    net, test, k = at_digits
    data = test.subset(torch.arange(48))
    torch.manual_seed(0)
    res = _evaluate(net, data, ["pgd:steps=10", "autoattack:version=quick"], num_classes=k)
    acc = {key: v["accuracy"] for key, v in res["attacks"].items()}
    assert acc["AutoAttack-quick@32/255"] <= acc["PGD-10@32/255"] + 3 / 48
    assert acc["AutoAttack-quick@32/255"] < res["clean"]


# --------------------------------------------------------------------------- command line


def _write_cifar_c(folder, names, n=20, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    from helpers import class_images

    x, y = class_images(n, seed=1)
    np.save(folder / "labels.npy", np.tile(y, 5))
    for name in names:
        noisy = np.concatenate([np.clip(x.transpose(0, 2, 3, 1).astype(int) + rng.integers(-8 * s, 8 * s + 1, x.shape[:1]
                                                                                                + (32, 32, 3)), 0, 255)
                                for s in range(1, 6)]).astype(np.uint8)
        np.save(folder / f"{name}.npy", noisy)


def test_cli_eval_protocol_writes_json_markdown_curves_and_corruptions(tiny_run, tmp_path):
    cc = tmp_path / "CIFAR-10-C"
    _write_cifar_c(cc, ["gaussian_noise", "contrast"])
    out = tmp_path / "ev" / "quick.json"
    res = run_in_process("eval", str(tiny_run), "--protocol", "quick", "--n", "40", "--attack", "pgd:steps=3,eps=4",
                  "--sweep-eps", "0", "4", "8", "--sweep-steps", "1", "3", "--corruptions", str(cc),
                  "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    assert set(result["attacks"]) == {"PGD-20@8/255", "CW-40@8/255", "PGD-3@4/255"}
    assert [p["eps"] * 255 for p in result["curves"]["eps"]["points"]] == pytest.approx([0, 4, 8])  # [0, 1] units
    assert [p["steps"] for p in result["curves"]["steps"]["points"]] == [1, 3]
    assert set(result["corruptions"]["per_corruption"]) == {"gaussian_noise", "contrast"}
    assert result["corruptions"]["comparable_with_cifar_c"] is True
    assert "checks" in result and isinstance(result["suspicious"], bool)
    md = out.with_suffix(".md").read_text()
    assert "| Natural |" in md and "CW-40@8/255" in md and "Sanity checks" in md
    assert "lacks 17 of the 19 corruptions" in res.stderr
    assert not list(out.parent.glob("*.state.npz"))  # the resume state goes once the result is written
    mean = result["corruptions"]["mean"]  # the console's number is the markdown's, and says what it means
    assert f"corruptions (mean over 2 corruptions) {mean:.4f}" in res.stdout
    assert f"| {100 * mean:.2f} |" in md


def test_cli_eval_generated_corruptions_of_grey_digits_skip_the_rgb_only_ones(tmp_path):
    run = tmp_path / "digits"
    code, _, err = run_main("train", "--dataset", "digits", "--model", "small_cnn", "--set", "model.width=8",
                            "--train-subset", "100", "--set", "data.val_size=50", "--set", "attack.steps=1",
                            "--epochs", "1", "--no-progress", "--threads", "1", "--out", str(run))
    assert code == 0, err
    out = tmp_path / "c.json"
    code, _, err = run_main("eval", str(run), "--corruptions", "generated", "--n", "8", "--no-checks",
                            "--no-progress", "--threads", "1", "--out", str(out))
    assert code == 0, err  # once: "saturate needs RGB images (3 channels), got 1; leave it out of names."
    assert err.count("saturate skipped, it needs RGB images (3 channels) and these have 1") == 1, err
    per_corruption = json.loads(out.read_text())["corruptions"]["per_corruption"]
    assert "saturate" not in per_corruption and len(per_corruption) == 13


@pytest.mark.parametrize("args, message", [
    (["--protocol", "quick", "--steps", "20"], "--steps describe the single default PGD attack, which --protocol "
                                               "leaves out"),
    (["--surrogate", "/x", "--steps", "3", "--restarts", "2"], "--steps, --restarts describe the single default PGD "
                                                               "attack, which --surrogate leaves out"),
    (["--corruptions", "generated", "--loss", "margin"], "--loss describe the single default PGD attack, which "
                                                         "--corruptions leaves out"),
    (["--attack", "pgd:steps=x"], "is not a valid"),
    (["--attack", "nope"], "unknown attack 'nope'"),
    (["--corruptions", "/no/such/folder"], "no such folder"),
    (["--sweep-steps", "0"], "--sweep-steps values must be >= 1"),
    (["--surrogate", "/no/such/run"], "does not exist"),
])
def test_cli_eval_bad_options_fail_clearly(tiny_run, args, message):
    code, out, err = run_main("eval", str(tiny_run), "--n", "8", "--no-progress", *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_cli_eval_refuses_the_model_itself_as_surrogate(tiny_run):
    code, _, err = run_main("eval", str(tiny_run), "--n", "8", "--surrogate", str(tiny_run), "--no-progress")
    assert code == 2 and "independently trained copy" in err


def test_imagenet_c_folder_flows_into_the_report(tmp_path):
    from test_corruptions import ColourLabel, write_imagenet_c

    from iaat.evaluation.corruptions import load_imagenet_c
    from iaat.evaluation.protocol import markdown_report

    root = write_imagenet_c(tmp_path)
    sets = load_imagenet_c(root, n=6, image_size=16, resize=20)
    _, _, clean_set = next(iter(load_imagenet_c(root, n=6, image_size=16, resize=20)))
    plan = build_plan(eps=[EPS], attacks=[], corruptions=str(root), checks=False)
    res = run_evaluation(ColourLabel(), clean_set, plan, num_classes=3, fingerprint={}, device=torch.device("cpu"),
                         corruption_sets=lambda: sets)
    assert res["clean"] == 1.0 and res["corruptions"]["imagenet_c"] and res["corruptions"]["mCE"] is None
    md = markdown_report(res)
    assert "Corruption (ImageNet-C, " in md and "ImageNet-C mCE: n/a" in md


@pytest.mark.parametrize("corr, column, value", [
    ({"comparable_with_cifar_c": True, "mean": 0.55, "benchmark_mean": 0.6, "per_corruption": dict.fromkeys("abc")},
     "Corruption (15 benchmark corruptions)", "60.00"),
    ({"comparable_with_cifar_c": False, "mean": 0.55, "benchmark_mean": None, "per_corruption": dict.fromkeys("ab")},
     "Corruption (generated, 2 corruptions)", "55.00"),
])
def test_the_corruption_column_gives_the_benchmark_mean_where_it_has_one(corr, column, value):
    """CIFAR-10-C's usual figure is the mean over its 15 benchmark corruptions, not over all 19 of the folder."""
    from iaat.evaluation.protocol import markdown_report

    md = markdown_report({"n": 10, "eps": 8 / 255, "norm": "linf", "clean": 0.9, "attacks": {}, "corruptions": corr})
    header, _, row = md.splitlines()[4:7]
    assert header.split(" | ")[-1].rstrip(" |") == column and row.split(" | ")[-1].rstrip(" |") == value


def test_under_l2_an_attack_with_its_own_radius_is_read_in_l2_and_kept_apart_from_l_inf():
    plan = build_plan(eps=[0.5], norm="l2", attacks=["pgd:steps=10,eps=128", "pgd:steps=5,norm=linf,eps=128",
                                                     "pgd:steps=3,eps=300"])
    assert [(s.label, s.norm) for s in plan.attacks] == [("PGD-10@128/255-l2", "l2"), ("PGD-5@128/255", "linf"),
                                                         ("PGD-3@300/255-l2", "l2")]
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    x, y = torch.rand(6, 3, 4, 4), torch.arange(6) % 3
    res = iaat.evaluate(model, x, y, attacks=["pgd:steps=2", "pgd:steps=2,norm=linf,eps=0.5/1"], eps=0.5,
                        norm="l2", checks=False)
    assert res["worst_case"]["over"] == ["PGD-2@127.5/255-l2"]  # the L-inf attack at the same number is apart


def test_a_transfer_attack_runs_with_the_target_and_start_its_label_names(monkeypatch):
    calls = []

    def recording_pgd(*args, **kwargs):
        calls.append(kwargs)
        return pgd(*args, **kwargs)

    monkeypatch.setattr(eval_attacks, "pgd", recording_pgd)
    model, other = (nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3)) for _ in range(2))
    x, y = torch.rand(6, 3, 4, 4), torch.arange(6) % 3
    spec = AttackSpec(kind="transfer", source="<surrogate module>", steps=2, targeted=True, random_start=False)
    res = iaat.evaluate(model, x, y, attacks=[spec], surrogate=other, eps=8 / 255, checks=False)
    assert list(res["attacks"]) == ["transfer-PGD-2-targeted-nostart@8/255"]
    assert calls and all(c["target"] is not None and c["random_start"] is False for c in calls)


def test_end_of_epoch_accuracy_attacks_only_what_it_can_count(monkeypatch):
    """The trainer's held-out evaluation counts a sample robust only if it is classified correctly when clean, so it
    attacks those alone (at CPU scale two thirds of the images are misclassified: most of its attack time)."""
    from iaat.data import ImageSet
    from iaat.evaluation import robustness

    torch.manual_seed(0)
    model = _Linear(torch.randn(3, 12), torch.zeros(3))
    x = (torch.rand(40, 3, 2, 2) * 255).to(torch.uint8)
    with torch.no_grad():
        clean = model(x.float() / 255).argmax(1)
    y = torch.where(torch.arange(40) % 2 == 0, clean, (clean + 1) % 3)  # every other image misclassified
    attacked: list = []
    real = robustness.run_attack
    monkeypatch.setattr(robustness, "run_attack", lambda spec, m, xs, ys, **kw: attacked.append(ys) or real(
        spec, m, xs, ys, **kw))
    res = robustness.accuracy(model, ImageSet(x, y), [AttackSpec(eps=8 / 255, steps=3)], batch_size=16)
    assert res["clean"] == 0.5 and sum(len(t) for t in attacked) == 20
    assert res["attacks"]["PGD-3@8/255"]["accuracy"] <= 0.5


def test_a_cut_evaluation_of_the_old_long_step_starts_afresh(tiny_run, tmp_path, monkeypatch):
    """A state written before eps/4 became the default step of attacks over 10 steps is this evaluation but for that:
    it is neither resumed (mixing steps) nor refused (stopping a sweep); the evaluation starts afresh with a note."""
    import iaat.eval_session as session
    from iaat.evaluation.state import EvalState

    out = tmp_path / "ev.json"
    args = ("eval", str(tiny_run), "--attack", "pgd:steps=12", "--n", "20", "--no-checks", "--out", str(out),
            "--no-progress")
    seen = {}

    def cut(*a, fingerprint, state_path, **kw):
        seen.update(fingerprint=fingerprint, state_path=state_path)
        raise KeyboardInterrupt

    monkeypatch.setattr(session, "run_evaluation", cut)
    assert run_in_process(*args).returncode == 130
    monkeypatch.undo()
    assert seen["fingerprint"]["long_attack_step"] == "eps/4"
    older = {k: v for k, v in seen["fingerprint"].items() if k != "long_attack_step"}
    old = EvalState(seen["state_path"], older)
    old.meta["progress"]["PGD-12@8/255"] = 1  # one batch done at the old step
    old.save()
    res = run_in_process(*args)
    assert res.returncode == 0, res.stderr
    assert "starts afresh instead of mixing the two steps" in res.stderr
    assert json.loads(out.read_text())["attacks"]["PGD-12@8/255"]["step"] == pytest.approx(2 / 255)
